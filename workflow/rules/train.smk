check_gpu_tokens()

if not PACKED:

    rule train:
        """One run. summary.json is written last, so its presence means finished; it is
        protected so a finished run is never retrained by accident. Checkpoints are not
        declared outputs: Snakemake deletes a job's outputs before rerunning it, and the CLI
        resumes an interrupted run from the last.ckpt it finds in the run directory."""
        input:
            manifest=ancient(prepared()),
            labels=ancient("data/prepared/{dataset}/noise/{noise}.npy"),
        output:
            summary=protected("results/runs/{dataset}/{noise}/{model}/{seed}/summary.json"),
        log:
            "logs/train/{dataset}/{noise}/{model}/{seed}.log",
        benchmark:
            "benchmarks/train/{dataset}/{noise}/{model}/{seed}.tsv"
        conda:
            "../envs/lambdapipe.yaml"
        threads: config["train"]["threads"]
        resources:
            **train_task_resources(),
            gpu=train_gpu_tokens,
            mem_mb=config["train"]["mem_mb"],
            runtime=config["train"]["runtime"],
        params:
            run_dir="results/runs/{dataset}/{noise}/{model}/{seed}",
            noise=noise_options,
            model=train_option("model"),
            recipe=train_option("recipe"),
            overrides=train_option("set"),
            model_args=train_option("model_args"),
            device=config["train"]["device"],
            deterministic="--deterministic" if config["train"]["deterministic"] else "",
        shell:  # the launcher is no param: runs on one GPU keep their command as it was
            train_launcher() + " train --model {params.model} {params.model_args}"
            " --dataset {wildcards.dataset} --data-dir data {params.noise}"
            " --seed {wildcards.seed} --out {params.run_dir} --recipe {params.recipe}"
            " {params.overrides} --device {params.device} {params.deterministic} --no-progress"
            " > {log} 2>&1"

else:

    for _seeds in PACKS:

        rule:
            """The seeds of one grid cell trained together in one process and one job (config
            `train: {pack: seeds}`; `fused`: as one network); each seed's run directory is
            what a single run writes, and a rerun resumes every unfinished seed from its
            last.ckpt."""
            name:
                PACK_RULES[_seeds]
            input:
                manifest=ancient(pack_input(_seeds, "manifest")),
                labels=ancient(pack_input(_seeds, "labels")),
            output:
                pack_outputs(_seeds),
            log:
                f"logs/train/{{cell}}/seeds-{'-'.join(map(str, _seeds))}.log",
            benchmark:
                f"benchmarks/train/{{cell}}/seeds-{'-'.join(map(str, _seeds))}.tsv"
            wildcard_constraints:
                cell=cell_pattern(_seeds),
            conda:
                "../envs/lambdapipe.yaml"
            threads: config["train"]["threads"]
            resources:
                gpu=train_gpu_tokens,
                mem_mb=config["train"]["mem_mb"],
                runtime=config["train"]["runtime"],
            params:
                seeds=",".join(map(str, _seeds)),
                dataset=pack_option(_seeds, "dataset"),
                noise=pack_option(_seeds, "noise"),
                model=pack_option(_seeds, "model"),
                recipe=pack_option(_seeds, "recipe"),
                overrides=pack_option(_seeds, "set"),
                model_args=pack_option(_seeds, "model_args"),
                device=config["train"]["device"],
                deterministic="--deterministic" if config["train"]["deterministic"] else "",
                fuse="--fuse" if config["train"]["pack"] == "fused" else "--no-fuse",
            shell:
                "lambdapipe train --model {params.model} {params.model_args}"
                " --dataset {params.dataset} --data-dir data {params.noise}"
                " --seeds {params.seeds} --out 'results/runs/{wildcards.cell}/{{seed}}'"
                " --recipe {params.recipe} {params.overrides} --device {params.device}"
                " {params.deterministic} {params.fuse} --no-progress > {log} 2>&1"
