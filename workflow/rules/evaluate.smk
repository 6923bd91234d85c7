rule evaluate:
    """Test-split accuracy, NLL, ECE, per-class accuracy and confusion matrix of best.ckpt.
    A run that diverged before its first evaluation has no best.ckpt: the CLI writes
    eval_test.json saying so, so one diverged run does not stop the rest of the grid."""
    input:
        summary=ancient("results/runs/{dataset}/{noise}/{model}/{seed}/summary.json"),
    output:
        "results/runs/{dataset}/{noise}/{model}/{seed}/eval_test.json",
    log:
        "logs/evaluate/{dataset}/{noise}/{model}/{seed}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}/{noise}/{model}/{seed}.tsv"
    conda:
        "../envs/lambdapipe.yaml"
    threads: 1
    resources:
        gpu=gpu_tokens,
        mem_mb=eval_mem_mb,
        runtime=eval_runtime,
    params:
        ckpt="results/runs/{dataset}/{noise}/{model}/{seed}/best.ckpt",
        device=config["train"]["device"],
    shell:
        "lambdapipe evaluate --ckpt {params.ckpt} --split test --data-dir data"
        " --out {output} --device {params.device} > {log} 2>&1"


rule explain:
    """FullGrad and Grad-CAM maps of best.ckpt on the first test images (the same for every
    run of a dataset) and a lambda layer's position embeddings: the report's attention and
    position figures. One seed per model and noise variant."""
    input:
        summary=ancient("results/runs/{dataset}/{noise}/{model}/{seed}/summary.json"),
    output:
        "results/runs/{dataset}/{noise}/{model}/{seed}/explain_test.json",
    log:
        "logs/explain/{dataset}/{noise}/{model}/{seed}.log",
    benchmark:
        "benchmarks/explain/{dataset}/{noise}/{model}/{seed}.tsv"
    conda:
        "../envs/lambdapipe.yaml"
    threads: 1
    resources:
        gpu=gpu_tokens,
        mem_mb=eval_mem_mb,
        runtime=eval_runtime,
    params:
        ckpt="results/runs/{dataset}/{noise}/{model}/{seed}/best.ckpt",
        device=config["train"]["device"],
    shell:
        "lambdapipe explain --ckpt {params.ckpt} --split test --images 8 --data-dir data"
        " --device {params.device} > {log} 2>&1"
