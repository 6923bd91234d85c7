rule download:
    """Official archive (or a mirror's copy), md5-checked; skipped for embedded datasets."""
    output:
        "data/raw/{archive}",
    log:
        "logs/download/{archive}.log",
    retries: 2
    conda:
        "../envs/lambdapipe.yaml"
    params:
        dataset=lambda wildcards: ARCHIVES[wildcards.archive],
        mirror=mirror_option,
    shell:
        "lambdapipe download --dataset {params.dataset} --data-dir data {params.mirror}"
        " > {log} 2>&1"
