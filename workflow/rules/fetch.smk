# fetch: raw images from a source into results/<experiment>/raw/ (never edited afterwards).
# Lensing sources write arrays (images.npy + truth.parquet); photo sources write metadata.parquet
# pointing at image files (downloaded under raw/hub/, or in place for local copies).
PHOTO_SOURCES = ["vlm4bio", "treeoflife", "rare_species", "image_folder"]
IS_PHOTO = config["source"] in PHOTO_SOURCES
RAW_FILES = ["rejects.parquet", "provenance.json"] + (["metadata.parquet"] if IS_PHOTO else ["truth.parquet"])

if config["source"] == "simulate":

    rule simulate:
        output:
            *[f"{RESULTS}/raw/{name}" for name in RAW_FILES],
            images=f"{RESULTS}/raw/images.npy",
            masks=f"{RESULTS}/raw/arc_masks.npy",
        params:
            cfg=stage_cfg("simulate"),
            out=folder_of("output", "masks"),
            code=code_version("simulate"),
        conda:
            ENV
        log:
            f"{RESULTS}/logs/simulate.log",
        benchmark:
            f"{RESULTS}/benchmarks/simulate.tsv"
        threads: site_threads(16)
        resources:
            **cpu_resources(mem_mb=4000, runtime=120),
        shell:
            "ssl4sci simulate --cfg {params.cfg:q} --out {params.out} --threads {threads} > {log} 2>&1"

elif config["source"] == "deeplense":

    rule fetch_deeplense:
        output:
            *[f"{RESULTS}/raw/{name}" for name in RAW_FILES],
            images=f"{RESULTS}/raw/images.npy",
        params:
            cfg=stage_cfg("deeplense"),
            out=folder_of("output", "images"),
            code=code_version("deeplense"),
        conda:
            ENV
        log:
            f"{RESULTS}/logs/fetch_deeplense.log",
        benchmark:
            f"{RESULTS}/benchmarks/fetch_deeplense.tsv"
        resources:
            **cpu_resources(mem_mb=8000, runtime=60),
        shell:
            "ssl4sci fetch-deeplense --cfg {params.cfg:q} --out {params.out} > {log} 2>&1"

else:

    rule fetch_photos:
        output:
            *[f"{RESULTS}/raw/{name}" for name in RAW_FILES],
        params:
            cfg=stage_cfg(config["source"]),
            source=config["source"],
            out=lambda wildcards, output: os.path.dirname(output[0]),
            code=code_version("fetch_photos"),
        conda:
            ENV
        log:
            f"{RESULTS}/logs/fetch_photos.log",
        benchmark:
            f"{RESULTS}/benchmarks/fetch_photos.tsv"
        threads: site_threads(4)
        resources:
            **cpu_resources(mem_mb=4000, runtime=1440),
        shell:
            "ssl4sci fetch --source {params.source} --cfg {params.cfg:q} --out {params.out} > {log} 2>&1"
