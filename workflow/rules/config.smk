# What the jobs read with --config, written by jobs (never while the Snakefile is parsed, so a
# dry run writes nothing): the study-wide file and one file per run. Each rule re-runs exactly
# when its file's content would change (its params carry the content's hash). The jobs declare
# the file as an `ancient` input and carry in their own params the hash of what changes their
# outputs: a file rewritten for another reason (a setting the job reads but that changes none
# of its outputs, such as training.log_every) reaches the job's next run without re-running it.


rule study_config:
    localrule: True
    output:
        study=STUDY_FILE,
    log:
        f"{LOGS}/config/study.log",
    params:
        settings_hash=get_study_settings_hash,
    run:
        write_settings(output.study, study_settings(), log[0])


rule run_config:
    localrule: True
    output:
        config=RUN_CONFIG,
    log:
        f"{LOGS}/config/{RUN_KEY}.log",
    params:
        settings_hash=get_run_settings_hash,
    run:
        write_settings(output.config, run_settings(wildcards), log[0])
