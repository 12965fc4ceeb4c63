# ssl4sci: raw scientific images -> self-supervised ViTs -> embeddings, evaluations, report.
# Run `snakemake --cores 2` (laptop) or `snakemake --profile profiles/slurm` (cluster).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/fetch.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/label_efficiency.smk"
include: "workflow/rules/attention.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/outcome.smk"


rule all:
    default_target: True
    input:
        **REPORT_OUTPUTS,
