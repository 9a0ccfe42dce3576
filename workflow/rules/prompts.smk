# k-shot prompts: demonstrations from train, balanced test reviews, tokenized once.


rule build_prompts:
    input:
        model=MODEL_DIR,
        data=data_files,
    output:
        prompts=PROMPTS,
        demonstrations=f"{RESULTS}/prompts/demonstrations.parquet",
        info=PROMPT_INFO,
    log:
        f"{LOGS}/build_prompts.log",
    conda:
        ENV
    params:
        data=config["data"],
        prompts=config["prompts"],
    script:
        "../scripts/build_prompts.py"
