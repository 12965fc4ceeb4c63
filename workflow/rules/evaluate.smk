# evaluate: frozen-embedding protocols (config evaluate.protocols) on each embedding file, on the
# class label and, for taxonomies, at each rank of evaluate.ranks.


rule evaluate:
    input:
        f"{RESULTS}/embeddings/{{method}}.parquet",
    output:
        f"{RESULTS}/eval/{{method}}/{{protocol}}.json",
    params:
        cfg=stage_cfg("evaluate", drop=("protocols", "ranks")),
        code=code_version("evaluate"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/evaluate_{{method}}_{{protocol}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_{{method}}_{{protocol}}.tsv"
    threads: site_threads(2)
    resources:
        **cpu_resources(mem_mb=4000, runtime=60),
    shell:
        "ssl4sci evaluate --cfg {params.cfg:q} --embeddings {input} --protocol {wildcards.protocol}"
        " --out {output} --threads {threads} > {log} 2>&1"


rule evaluate_rank:
    input:
        f"{RESULTS}/embeddings/{{method}}.parquet",
    output:
        f"{RESULTS}/eval/{{method}}/ranks/{{rank}}/{{protocol}}.json",
    params:
        cfg=stage_cfg("evaluate", drop=("protocols", "ranks")),
        code=code_version("evaluate"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/evaluate_{{method}}_{{rank}}_{{protocol}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_{{method}}_{{rank}}_{{protocol}}.tsv"
    threads: site_threads(2)
    resources:
        **cpu_resources(mem_mb=4000, runtime=60),
    shell:
        "ssl4sci evaluate --cfg {params.cfg:q} --embeddings {input} --protocol {wildcards.protocol} --rank {wildcards.rank}"
        " --out {output} --threads {threads} > {log} 2>&1"
