# label_efficiency: each method with 1/10/100 % of the train labels (nested, stratified, seeded subsets), as a
# linear probe on its frozen embeddings and as fine-tuning from its weights; regression at the same fractions.
LE_PROTOCOLS = config["label_efficiency"]["protocols"]


rule label_efficiency:
    input:
        **DATA,
        ckpt=checkpoint_for,
        embeddings=f"{RESULTS}/embeddings/{{method}}.parquet" if "linear" in LE_PROTOCOLS else [],
    output:
        metrics=f"{RESULTS}/label_efficiency/{{method}}/metrics.json",
        subsets=f"{RESULTS}/label_efficiency/{{method}}/subsets.parquet",
    params:
        # the settings that change its numbers: its own section, the regression target and the augmentation domain
        cfg=stage_cfg("label_efficiency", drop=("methods",)),
        regress_target=config["finetune"]["regress_target"],
        regress_label=config["finetune"]["regress_label"],
        domain=config["pretrain"]["augment"]["domain"],
        model=model_param,
        data=folder_of("input", "manifest"),
        out=folder_of("output", "metrics"),
        embeddings=lambda wildcards, input: f"--embeddings {input.embeddings}" if input.get("embeddings") else "",
        checkpoint=checkpoint_arg,
        device=DEVICE,
        code=code_version("label_efficiency"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/label_efficiency_{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/label_efficiency_{{method}}.tsv"
    threads: site_threads(8)
    resources:
        **gpu_resources(mem_mb=8000, runtime=720),
    shell:
        "ssl4sci label-efficiency --cfg {params.cfg:q} --model {params.model:q} --data {params.data}"
        " --method {wildcards.method} {params.checkpoint} {params.embeddings}"
        " --regress-target {params.regress_target:q} --regress-label {params.regress_label:q} --domain {params.domain}"
        " --out {params.out} --device {params.device} --threads {threads} --no-progress > {log} 2>&1"
