# prepare: crop to the signal, resize, split (seeded, stratified), shard, normalisation statistics.
rule prepare:
    input:
        [f"{RESULTS}/raw/{name}" for name in RAW_FILES],
        images=f"{RESULTS}/raw/images.npy",
        masks=[f"{RESULTS}/raw/arc_masks.npy"] if config["source"] == "simulate" else [],
    output:
        manifest=f"{RESULTS}/data/manifest.parquet",
        shards=directory(f"{RESULTS}/data/shards"),
        stats=f"{RESULTS}/data/stats.json",
        rejects=f"{RESULTS}/data/rejects.parquet",
        samples=report(f"{RESULTS}/data/samples.png", caption="../report/samples.rst", category="Data"),
    params:
        cfg=stage_cfg("prepare"),
        raw=folder_of("input", "images"),
        out=folder_of("output", "manifest"),
        source=config["source"],
        code=code_version("prepare"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/prepare.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare.tsv"
    resources:
        **cpu_resources(mem_mb=4000, runtime=60),
    shell:
        "ssl4sci prepare --cfg {params.cfg:q} --raw {params.raw} --out {params.out} --source {params.source} > {log} 2>&1"
