# relora-study: full-rank vs ReLoRA pretraining of small language models (docs/design.md).
#
#   snakemake --cores all                                          the default study (config.yaml)
#   snakemake --cores all --configfile workflow/studies/cpu.yaml   another study, which REPLACES
#                                                                  config.yaml (nothing is merged)
#   snakemake --workflow-profile profiles/slurm --configfile workflow/studies/paper.yaml
#
# The study is validated and resolved by relora.config, the resolver the `relora` command uses.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/config.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/dynamics.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_output(),
    default_target: True
