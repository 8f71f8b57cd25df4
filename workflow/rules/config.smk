# What the jobs read with --config, written by jobs (never while the Snakefile is parsed, so a
# dry run writes nothing): one file per stage, and per run for the train, evaluate and dynamics
# stages. A file is rewritten exactly when a setting its stage's outputs depend on changes (its
# params carry their hash, common.smk: STAGE_HASHES), and so re-runs the stage's jobs, which read
# it as an input; settings that change no output (how often training logs or saves its state)
# reach a file when it is next rewritten.


rule study_config:
    localrule: True
    output:
        config=STUDY_CONFIG,
    log:
        f"{LOGS}/config/{{stage}}.log",
    params:
        settings_hash=get_stage_hash,
    wildcard_constraints:
        stage="data|blimp|aggregate|report",
    run:
        write_settings(output.config, study_settings(), log[0])


rule run_config:
    localrule: True
    output:
        config=RUN_CONFIG,
    log:
        f"{LOGS}/config/{{stage}}/{RUN_KEY}.log",
    params:
        settings_hash=get_stage_hash,
    wildcard_constraints:
        stage="train|evaluate|dynamics",
    run:
        write_settings(output.config, run_settings(wildcards), log[0])
