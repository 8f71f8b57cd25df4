# Pretraining: one job per (size, condition, seed). Its resumable state lives in RESUME, which is
# not a declared output (Snakemake deletes the outputs of a job before re-running it), so a
# preempted or timed-out job that is retried or requeued continues where it stopped. With
# workflow.gpus.train N > 1 the job runs the trainer under torchrun, one process per GPU of its node.


rule train:
    input:
        unpack(get_train_data),
        config=run_config("train"),
    output:
        run=f"{RUN}/run.json",
        metrics=f"{RUN}/train_metrics.parquet",
        checkpoints=directory(f"{RUN}/checkpoints"),
    log:
        f"{LOGS}/train/{RUN_KEY}.log",
    benchmark:
        f"{BENCHMARKS}/train/{RUN_KEY}.tsv"
    params:
        data=input_dir("tokenizer"),
        run_dir=output_dir("run"),
        resume_dir=RESUME,
        launcher=get_train_launcher,
        process_threads=get_train_process_threads,
    threads: threads_for("train")
    resources:
        mem_mb=get_train_mem_mb,
        runtime=get_train_runtime,
        gpu=get_train_gpus,
        gpu_mem_mb=get_train_gpu_mem_mb,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launcher} train --config {input.config} --size {wildcards.size}"
        " --condition {wildcards.condition} --seed {wildcards.seed} --data {params.data}"
        " --out {params.run_dir} --resume-dir {params.resume_dir} --threads {params.process_threads}"
        " > {log} 2>&1"
