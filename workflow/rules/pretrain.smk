# pretrain: self-supervised training; the checkpoint holds everything needed to resume.
DATA = [f"{RESULTS}/data/manifest.parquet", f"{RESULTS}/data/stats.json", f"{RESULTS}/data/shards"]


rule pretrain:
    input:
        DATA,
    output:
        ckpt=f"{RESULTS}/pretrain/{{method}}/last.ckpt",
        metrics=f"{RESULTS}/pretrain/{{method}}/metrics.csv",
        loss=report(f"{RESULTS}/pretrain/{{method}}/loss.png", caption="../report/loss.rst", category="Pretraining"),
    wildcard_constraints:
        method="|".join(PRETRAIN_METHODS),
    params:
        cfg=stage_cfg("pretrain", drop=("methods",)),
        model=MODEL_CFG,
        data=f"{RESULTS}/data",
        out=lambda w: f"{RESULTS}/pretrain/{w.method}",
        device=DEVICE,
        code=code_version("pretrain"),
    log:
        f"{RESULTS}/logs/pretrain_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain_{{method}}.tsv"
    threads: 8
    resources:
        mem_mb=16000,
        runtime=1440,
    shell:
        "ssl4sci pretrain --cfg {params.cfg:q} --model {params.model:q} --data {params.data} --method {wildcards.method}"
        " --out {params.out} --device {params.device} --threads {threads} --no-progress > {log} 2>&1"
