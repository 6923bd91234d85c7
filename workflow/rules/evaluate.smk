rule evaluate:
    """Test-split accuracy, NLL, ECE, per-class accuracy and confusion matrix of best.ckpt."""
    input:
        summary="results/runs/{dataset}/{noise}/{model}/{seed}/summary.json",
    output:
        "results/runs/{dataset}/{noise}/{model}/{seed}/eval_test.json",
    params:
        ckpt="results/runs/{dataset}/{noise}/{model}/{seed}/best.ckpt",
        device=config["train"]["device"],
    log:
        "logs/evaluate/{dataset}/{noise}/{model}/{seed}.log",
    conda:
        "../../environment.yml"
    threads: 1
    resources:
        gpu=gpu_tokens,
    shell:
        "lambdapipe evaluate --ckpt {params.ckpt} --split test --data-dir data"
        " --out {output} --device {params.device} > {log} 2>&1"
