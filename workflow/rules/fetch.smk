# fetch: raw images from the configured source (ssl4sci.registry.sources) into results/<experiment>/raw/, never
# edited afterwards. Lensing sources write arrays (images.npy + truth.parquet); photo sources write metadata.parquet
# pointing at image files (downloaded under raw/hub/, or in place for local copies).


rule fetch:
    output:
        *[f"{RESULTS}/raw/{name}" for name in RAW_FILES],
    params:
        cfg=stage_cfg(config["source"]),
        source=config["source"],
        out=lambda wildcards, output: os.path.dirname(output[0]),
        code=code_version("fetch"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/fetch.log",
    benchmark:
        f"{RESULTS}/benchmarks/fetch.tsv"
    threads: site_threads(SOURCE.threads)
    resources:
        **cpu_resources(mem_mb=SOURCE.mem_mb, runtime=SOURCE.runtime_min),
    shell:
        "ssl4sci fetch --source {params.source} --cfg {params.cfg:q} --out {params.out} --threads {threads} > {log} 2>&1"
