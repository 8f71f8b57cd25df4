# Learning dynamics of every analysis-step checkpoint of a run: spectra (numerical rank,
# effective rank, PER, condition number) of weights, probe gradients, updates and adapters, and
# CKA of each block's output to the final step.

from relora.config import cka_settings

_CKA = cka_settings(STUDY["analysis"])
# CKA over the evaluation documents (analysis.cka.rows: eval) reads data/eval/ as well
DYNAMICS_EVAL = [f"{DATA}/eval"] if _CKA["enabled"] and _CKA["rows"] == "eval" else []


rule dynamics:
    input:
        config=run_config("dynamics"),
        run=f"{RUN}/run.json",
        checkpoints=f"{RUN}/checkpoints",
        probe=f"{DATA}/probe.npy",
        eval=DYNAMICS_EVAL,
    output:
        dynamics=f"{RUN}/dynamics.parquet",
    log:
        f"{LOGS}/dynamics/{RUN_KEY}.log",
    benchmark:
        f"{BENCHMARKS}/dynamics/{RUN_KEY}.tsv"
    params:
        data=input_dir("probe"),
        run_dir=input_dir("run"),
    threads: threads_for("dynamics")
    resources:
        mem_mb=mem_mb_for("dynamics"),
        runtime=runtime_for("dynamics"),
        gpu=gpus_for("dynamics"),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m relora dynamics --config {input.config} --data {params.data}"
        " --run {params.run_dir} --threads {threads} > {log} 2>&1"
