# Results: every run's tables -> one DuckDB database -> Altair figures -> one HTML report.


rule aggregate:
    input:
        unpack(get_run_outputs),
        unpack(get_blimp_reference),
        config=study_config("aggregate"),
        blimp_unigram=f"{DATA}/blimp_unigram.parquet",
    output:
        db=f"{RESULTS}/study.duckdb",
    log:
        f"{LOGS}/results/aggregate.log",
    params:
        runs=get_run_dirs,
    threads: threads_for("results")
    resources:
        mem_mb=mem_mb_for("results"),
        runtime=runtime_for("results"),
    conda:
        "../../envs/results.yaml"
    shell:
        "python -m relora aggregate --config {input.config} --runs {params.runs}"
        " --blimp-baselines {input.blimp_unigram} --out {output.db} > {log} 2>&1"


rule figures:
    input:
        db=f"{RESULTS}/study.duckdb",
    output:
        figures=report(
            directory(f"{RESULTS}/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Figures",
        ),
    log:
        f"{LOGS}/results/figures.log",
    params:
        results_hash=get_results_hash,
    threads: threads_for("results")
    resources:
        mem_mb=mem_mb_for("results"),
        runtime=runtime_for("results"),
    conda:
        "../../envs/results.yaml"
    shell:
        "python -m relora figures --db {input.db}"
        " --out-dir {output.figures} > {log} 2>&1"


rule report:
    input:
        config=study_config("report"),
        db=f"{RESULTS}/study.duckdb",
        figures=f"{RESULTS}/figures",
        manifest=f"{DATA}/manifest.json",
    output:
        report=report(
            f"{RESULTS}/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        f"{LOGS}/results/report.log",
    threads: threads_for("results")
    resources:
        mem_mb=mem_mb_for("results"),
        runtime=runtime_for("results"),
    conda:
        "../../envs/results.yaml"
    shell:
        "python -m relora report --config {input.config} --db {input.db}"
        " --figures {input.figures} --manifest {input.manifest} --out {output.report} > {log} 2>&1"
