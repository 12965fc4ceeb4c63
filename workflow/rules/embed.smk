# embed: every image of every split -> one embedding per image, in Parquet with provenance.
rule embed:
    input:
        **DATA,
        ckpt=checkpoint_for,
    output:
        f"{RESULTS}/embeddings/{{method}}.parquet",
    params:
        cfg=stage_cfg("embed", drop=("baselines", "timm_baselines")),
        timm=timm_arg,
        model=model_param,
        data=folder_of("input", "manifest"),
        checkpoint=checkpoint_arg,
        device=DEVICE,
        code=code_version("embed"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/embed_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/embed_{{method}}.tsv"
    threads: site_threads(4)
    resources:
        **gpu_resources(mem_mb=4000, runtime=120),
    shell:
        "ssl4sci embed --cfg {params.cfg:q} --model {params.model:q} --data {params.data} --method {wildcards.method}"
        " {params.checkpoint} {params.timm} --out {output} --device {params.device} --threads {threads} > {log} 2>&1"
