# finetune: backbone + linear head trained on labels; classification and regression.


for _task, _figure in FINETUNE_FIGURE.items():

    rule:
        name:
            f"finetune_{_task}"
        input:
            **DATA,
            ckpt=checkpoint_for,
        output:
            metrics=f"{RESULTS}/finetune/{{method}}/{_task}/metrics.json",
            figure=report(f"{RESULTS}/finetune/{{method}}/{_task}/{_figure}", caption="../report/finetune.rst", category="Fine-tuning"),
        params:
            cfg=stage_cfg("finetune", drop=("methods", "tasks")),
            model=model_param,
            data=folder_of("input", "manifest"),
            out=folder_of("output", "metrics"),
            task=_task,
            # photos: horizontal flips only; a 90° rotation is not a symmetry of a butterfly
            domain=config["pretrain"]["augment"]["domain"],
            checkpoint=checkpoint_arg,
            device=DEVICE,
            code=code_version("finetune"),
        conda:
            ENV
        log:
            f"{RESULTS}/logs/finetune_{{method}}_{_task}.log",
        benchmark:
            f"{RESULTS}/benchmarks/finetune_{{method}}_{_task}.tsv"
        threads: site_threads(8)
        resources:
            **gpu_resources(mem_mb=8000, runtime=720),
        shell:
            "ssl4sci finetune --cfg {params.cfg:q} --model {params.model:q} --data {params.data} --method {wildcards.method}"
            " {params.checkpoint} --task {params.task} --domain {params.domain} --out {params.out} --device {params.device} --threads {threads}"
            " --no-progress > {log} 2>&1"
