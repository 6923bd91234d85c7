rule download:
    """Official archive (or a mirror's copy), md5-checked; skipped for embedded datasets."""
    output:
        "data/raw/{archive}",
    params:
        dataset=lambda wildcards: ARCHIVES[wildcards.archive],
        mirror=mirror_option,
    log:
        "logs/download/{archive}.log",
    conda:
        "../envs/lambdapipe.yaml"
    retries: 2
    shell:
        "lambdapipe download --dataset {params.dataset} --data-dir data {params.mirror}"
        " > {log} 2>&1"
