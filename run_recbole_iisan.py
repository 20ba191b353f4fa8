"""Run a recbole_iisan model or any RecBole built-in model on a dataset.

    python run_recbole_iisan.py -m IISANVersa -d demo [--config_files "a.yaml b.yaml"] [--key=value ...]

Unknown ``--key=value`` arguments are RecBole config overrides (RecBole reads them from
the command line itself), e.g. ``--epochs=5 --result_file=result.json``.
"""
import argparse

from recbole_iisan.quick_start import run_recbole_iisan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default="IISANVersa", help="model name, e.g. IISANVersa, SASRec")
    parser.add_argument("--dataset", "-d", default="demo", help="dataset folder name under data_path")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    args, overrides = parser.parse_known_args(argv)
    config_files = args.config_files.split() if args.config_files else None
    result = run_recbole_iisan(model=args.model, dataset=args.dataset,
                               config_file_list=config_files, cmd_args=overrides)
    print(f"test result: {result['test_result']}")
    return result


if __name__ == "__main__":
    main()
