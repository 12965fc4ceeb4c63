# pretrain: self-supervised training; the checkpoint holds everything needed to resume.


rule pretrain:
    input:
        **DATA,
    output:
        ckpt=f"{RESULTS}/pretrain/{{method}}/last.ckpt",
        metrics=f"{RESULTS}/pretrain/{{method}}/metrics.csv",
        loss=report(f"{RESULTS}/pretrain/{{method}}/loss.png", caption="../report/loss.rst", category="Pretraining"),
    wildcard_constraints:
        method="|".join(PRETRAIN_METHODS),
    params:
        cfg=pretrain_cfg,
        model=model_param,
        data=folder_of("input", "manifest"),
        out=folder_of("output", "ckpt"),
        device=DEVICE,
        launcher=ddp_launcher(config["pretrain"]["devices"] * config["pretrain"]["nodes"]),
        code=code_version("pretrain"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/pretrain_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain_{{method}}.tsv"
    threads: site_threads(8)
    resources:
        **gpu_resources(mem_mb=8000, runtime=1440, gpus=config["pretrain"]["devices"], nodes=config["pretrain"]["nodes"]),
    shell:
        "{params.launcher} ssl4sci pretrain --cfg {params.cfg:q} --model {params.model:q} --data {params.data} --method {wildcards.method}"
        " --out {params.out} --device {params.device} --threads {threads} --no-progress > {log} 2>&1"
