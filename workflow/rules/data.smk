# Data (docs/design.md): corpus -> tokenizer -> token shards and held-out domains, probe batch,
# BLiMP pairs, all under results/<study>/data/.

# Stages that download with the study's sources are local rules (common.smk: downloads).


rule corpus:
    localrule: downloads("corpus")
    input:
        config=study_config("data"),
    output:
        corpus=directory(f"{DATA}/corpus"),
    log:
        f"{LOGS}/data/corpus.log",
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m relora corpus --config {input.config} --out {output.corpus} > {log} 2>&1"


rule tokenizer:
    localrule: downloads("tokenizer")
    input:
        config=study_config("data"),
        corpus=f"{DATA}/corpus",
    output:
        tokenizer=f"{DATA}/tokenizer.json",
    log:
        f"{LOGS}/data/tokenizer.log",
    threads: threads_for("data")
    resources:
        mem_mb=mem_mb_for("data"),
        runtime=runtime_for("data"),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m relora tokenizer --config {input.config} --corpus {input.corpus}"
        " --out {output.tokenizer} --threads {threads} > {log} 2>&1"


rule tokenize:
    localrule: downloads("tokenize")
    input:
        config=study_config("data"),
        corpus=f"{DATA}/corpus",
        tokenizer=f"{DATA}/tokenizer.json",
    output:
        **get_tokenize_outputs(),
    log:
        f"{LOGS}/data/tokenize.log",
    params:
        data=output_dir("eval"),
    threads: threads_for("data")
    resources:
        mem_mb=mem_mb_for("data"),
        runtime=runtime_for("data"),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m relora tokenize --config {input.config} --corpus {input.corpus}"
        " --tokenizer {input.tokenizer} --out {params.data} --threads {threads} > {log} 2>&1"


rule probe:
    input:
        config=study_config("data"),
        eval=f"{DATA}/eval",
        tokenizer=f"{DATA}/tokenizer.json",
    output:
        probe=f"{DATA}/probe.npy",
    log:
        f"{LOGS}/data/probe.log",
    resources:
        mem_mb=mem_mb_for("data"),
        runtime=runtime_for("data"),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m relora probe --config {input.config} --eval {input.eval}"
        " --tokenizer {input.tokenizer} --out {output.probe} > {log} 2>&1"


rule blimp:
    # after tokenize: the unigram frequency baseline counts the training tokens (train.npy, or
    # the first evaluation.blimp.unigram_rows rows of a training stream)
    localrule: downloads("blimp")
    input:
        unpack(get_blimp_source),
        config=study_config("blimp"),
        **tokenized_files(),
        corpus=f"{DATA}/corpus",
        tokenizer=f"{DATA}/tokenizer.json",
    output:
        blimp=directory(f"{DATA}/blimp"),
        unigram=f"{DATA}/blimp_unigram.parquet",
    log:
        f"{LOGS}/data/blimp.log",
    resources:
        mem_mb=mem_mb_for("data"),
        runtime=runtime_for("data"),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m relora blimp --config {input.config} --corpus {input.corpus}"
        " --tokenizer {input.tokenizer} --out {output.blimp} > {log} 2>&1"


rule manifest:
    # sources, versions, sha256 and size of every data file, merged from each stage's record
    input:
        **tokenized_files(),
        tokenizer=f"{DATA}/tokenizer.json",
        probe=f"{DATA}/probe.npy",
        blimp=f"{DATA}/blimp",
        blimp_unigram=f"{DATA}/blimp_unigram.parquet",
    output:
        manifest=f"{DATA}/manifest.json",
    log:
        f"{LOGS}/data/manifest.log",
    params:
        data=input_dir("tokenizer"),
    conda:
        "../../envs/data.yaml"
    shell:
        "python -m relora manifest --data {params.data} > {log} 2>&1"
