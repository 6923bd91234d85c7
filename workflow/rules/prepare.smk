rule prepare:
    """Verified, split uint8 arrays, their manifest and the clean labels as a noise variant
    (noise/clean.*). It owns data/prepared/<dataset>: a re-run (new split options) starts
    from an empty directory, and every noise variant and run downstream is then out of
    date."""
    input:
        archive_of,
    output:
        manifest=prepared(),
        arrays=multiext(
            "data/prepared/{dataset}/",
            "train_images.npy",
            "train_labels.npy",
            "val_images.npy",
            "val_labels.npy",
            "test_images.npy",
            "test_labels.npy",
        ),
        clean_labels="data/prepared/{dataset}/noise/clean.npy",
        clean_spec="data/prepared/{dataset}/noise/clean.json",
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../envs/lambdapipe.yaml"
    params:
        options=prepare_options,
        mirror=mirror_option,
    shell:
        "rm -rf data/prepared/{wildcards.dataset} && lambdapipe prepare"
        " --dataset {wildcards.dataset} --data-dir data {params.options} {params.mirror}"
        " > {log} 2>&1"


rule noise:
    """One noisy-label variant of the training labels (re-uses the prepared arrays); the
    clean one is prepare's."""
    input:
        ancient(prepared()),
    output:
        labels="data/prepared/{dataset}/noise/{noise}.npy",
        spec="data/prepared/{dataset}/noise/{noise}.json",
    log:
        "logs/noise/{dataset}/{noise}.log",
    wildcard_constraints:
        noise=r"[a-z]+-[0-9.e+-]+(-s[0-9]+)?",
    conda:
        "../envs/lambdapipe.yaml"
    params:
        options=prepare_options,
        noise=noise_options,
    shell:
        "lambdapipe prepare --dataset {wildcards.dataset} --data-dir data {params.options}"
        " {params.noise} > {log} 2>&1"
