# Evaluation of every evaluation-step checkpoint of a run: per-domain perplexity and bits per
# byte on the held-out documents, and BLiMP accuracy per paradigm.


rule evaluate:
    input:
        config=run_config("evaluate"),
        run=f"{RUN}/run.json",
        checkpoints=f"{RUN}/checkpoints",
        eval=f"{DATA}/eval",
        blimp=f"{DATA}/blimp",
        tokenizer=f"{DATA}/tokenizer.json",
    output:
        perplexity=f"{RUN}/perplexity.parquet",
        blimp=f"{RUN}/blimp.parquet",
    log:
        f"{LOGS}/evaluate/{RUN_KEY}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate/{RUN_KEY}.tsv"
    params:
        data=input_dir("tokenizer"),
        run_dir=input_dir("run"),
    threads: threads_for("evaluate")
    resources:
        mem_mb=mem_mb_for("evaluate"),
        runtime=runtime_for("evaluate"),
        gpu=gpus_for("evaluate"),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m relora evaluate --config {input.config} --data {params.data}"
        " --run {params.run_dir} --threads {threads} > {log} 2>&1"
