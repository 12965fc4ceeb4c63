# prepare: crop to the signal, resize, split (seeded, stratified), shard, normalisation statistics.
rule prepare:
    input:
        [f"{RESULTS}/raw/{name}" for name in RAW_FILES],
        raw=f"{RESULTS}/raw/{RAW_FILES[0]}",
    output:
        manifest=f"{RESULTS}/data/manifest.parquet",
        shards=directory(f"{RESULTS}/data/shards"),
        stats=f"{RESULTS}/data/stats.json",
        rejects=f"{RESULTS}/data/rejects.parquet",
        samples=report(f"{RESULTS}/data/samples.png", caption="../report/samples.rst", category="Data"),
    params:
        cfg=stage_cfg("prepare"),
        raw=folder_of("input", "raw"),
        out=folder_of("output", "manifest"),
        source=config["source"],
        code=code_version("prepare"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare.tsv"
    threads: site_threads(4)
    resources:
        **cpu_resources(mem_mb=4000, runtime=240),
    shell:
        "ssl4sci prepare --cfg {params.cfg:q} --raw {params.raw} --out {params.out} --source {params.source} --threads {threads} > {log} 2>&1"
