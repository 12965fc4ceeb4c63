# attention: last-block CLS attention per head on test images; share of attention on the lensed arc.
rule attention:
    input:
        **DATA,
        ckpt=checkpoint_for,
    output:
        gallery=report(f"{RESULTS}/attention/{{method}}/gallery.png", caption="../report/attention.rst", category="Attention"),
        scores=f"{RESULTS}/attention/{{method}}/scores.json",
    params:
        cfg=stage_cfg("attention", drop=("methods",)),
        model=model_param,
        data=folder_of("input", "manifest"),
        out=folder_of("output", "scores"),
        checkpoint=checkpoint_arg,
        device=DEVICE,
        code=code_version("attention"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/attention_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/attention_{{method}}.tsv"
    threads: site_threads(2)
    resources:
        **gpu_resources(mem_mb=4000, runtime=60),
    shell:
        "ssl4sci attention --cfg {params.cfg:q} --model {params.model:q} --data {params.data} --method {wildcards.method}"
        " {params.checkpoint} --out {params.out} --device {params.device} --threads {threads} > {log} 2>&1"
