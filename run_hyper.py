"""Tune a recbole_iisan or RecBole model's hyperparameters on RecBole's HyperTuning.

    python run_hyper.py --model IISANVersa --dataset demo \\
        --params_file properties/hyper/iisan_versa.hyper [--config_files "a.yaml b.yaml"] \\
        [--algo exhaustive|random|bayes] [--max_evals N] [--output_file F] [--tool hyperopt|ray]

Every trial's parameters and valid/test results, then the best, are written to the
output file (JSON when its name ends in .json), rewritten after each trial. Unknown
``--key=value`` arguments are config settings shared by every trial, e.g.
``--data_path=/data``; a setting the params file sweeps (or fixes) is refused there.
"""
import argparse

from recbole_iisan.hyper import ALGOS, TOOLS, parse_overrides, run_sweep


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default="IISANVersa", help="model name, e.g. IISANVersa, SASRec")
    parser.add_argument("--dataset", "-d", default="demo", help="dataset folder name under data_path")
    parser.add_argument("--params_file", required=True, help="search space, e.g. properties/hyper/sasrec.hyper")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files shared by every trial")
    parser.add_argument("--algo", default="exhaustive", choices=ALGOS, help="search algorithm")
    parser.add_argument("--max_evals", type=int, default=None,
                        help="most trials (exhaustive: default the whole grid; random/bayes: required)")
    parser.add_argument("--early_stop", type=int, default=None,
                        help="stop after this many trials without improvement (hyperopt only)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the search (hyperopt only)")
    parser.add_argument("--output_file", default=None,
                        help="results file (default hyper_<model>_<dataset>.result)")
    parser.add_argument("--display_file", default=None, help="HTML plot of the trials (hyperopt only)")
    parser.add_argument("--tool", default="hyperopt", choices=TOOLS,
                        help="hyperopt (RecBole's HyperTuning) or ray (Ray Tune, optional)")
    args, rest = parser.parse_known_args(argv)
    output_file = args.output_file or f"hyper_{args.model}_{args.dataset}.result"
    options = {key: value for key, value in (("early_stop", args.early_stop), ("seed", args.seed),
                                            ("display_file", args.display_file))
               if value is not None}
    sweep = run_sweep(tool=args.tool, model=args.model, dataset=args.dataset,
                      params_file=args.params_file,
                      config_file_list=args.config_files.split() if args.config_files else None,
                      config_dict=parse_overrides(rest), algo=args.algo, max_evals=args.max_evals,
                      output_file=output_file, **options)
    best = sweep.best
    print(f"{len(sweep.finished)} of {len(sweep.trials)} trials finished; results in {output_file}")
    print(f"best params: {best.params}")
    print(f"best valid score: {best.best_valid_score:.4f}")
    print(f"test result: {best.test_result}")
    return sweep


if __name__ == "__main__":
    main()
