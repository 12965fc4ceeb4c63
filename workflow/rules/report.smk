# report: one self-contained HTML page, a Markdown table and the same numbers in JSON.
FT_METHODS = config["finetune"]["methods"]
FT_TASKS = config["finetune"]["tasks"]
REPORT_INPUTS = {
    "samples_png": f"{RESULTS}/data/samples.png",
    "stats_json": f"{RESULTS}/data/stats.json",
    "loss_png": expand(f"{RESULTS}/pretrain/{{method}}/loss.png", method=PRETRAIN_METHODS),
    "pretrain_metrics_csv": expand(f"{RESULTS}/pretrain/{{method}}/metrics.csv", method=PRETRAIN_METHODS),
    "eval_json": [
        *expand(f"{RESULTS}/eval/{{method}}/{{protocol}}.json", method=METHODS, protocol=PROTOCOLS),
        *expand(f"{RESULTS}/eval/{{method}}/ranks/{{rank}}/{{protocol}}.json", method=METHODS, rank=RANKS,
                protocol=RANK_PROTOCOLS),
    ],
    "finetune_json": expand(f"{RESULTS}/finetune/{{method}}/{{task}}/metrics.json", method=FT_METHODS, task=FT_TASKS),
    "finetune_png": [f"{RESULTS}/finetune/{m}/{t}/{FINETUNE_FIGURE[t]}" for m in FT_METHODS for t in FT_TASKS],
    "label_efficiency_json": expand(f"{RESULTS}/label_efficiency/{{method}}/metrics.json", method=LE_METHODS),
    "attention_png": expand(f"{RESULTS}/attention/{{method}}/gallery.png", method=config["attention"]["methods"]),
    "attention_json": expand(f"{RESULTS}/attention/{{method}}/scores.json", method=config["attention"]["methods"]),
}


rule report:
    input:
        **REPORT_INPUTS,
    output:
        **REPORT_OUTPUTS,
    params:
        inputs=json.dumps(REPORT_INPUTS),
        experiment=config["experiment"],
        config=json.dumps(config, sort_keys=True),
        code=code_version("report"),
    conda:
        ENV
    log:
        f"{RESULTS}/logs/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report.tsv"
    resources:
        **cpu_resources(mem_mb=1000, runtime=15),
    shell:
        "ssl4sci report --inputs {params.inputs:q} --experiment {params.experiment} --config {params.config:q}"
        " --html {output.html} --md {output.md} --json {output.json} > {log} 2>&1"
