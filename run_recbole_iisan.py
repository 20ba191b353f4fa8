"""Run a recbole_iisan model or any RecBole built-in model on a dataset.

    python run_recbole_iisan.py -m IISANVersa -d demo [--config_files "a.yaml b.yaml"] [--key=value ...]

Unknown ``--key=value`` arguments are RecBole config overrides (RecBole reads them from
the command line itself), e.g. ``--epochs=5 --result_file=result.json``.

Several processes, as RecBole's run_recbole.py: ``--nproc=N`` ranks on this machine (one
GPU each from ``--gpu_id=0,1,..``, or CPU ranks with gloo when no GPU is used); across
machines add ``--world_size``, ``--ip`` and ``--port`` of rank 0's machine and
``--group_offset`` (the global rank of this machine's first process).
"""
import argparse

from recbole_iisan.quick_start import run_recbole_iisan_ddp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", default="IISANVersa", help="model name, e.g. IISANVersa, SASRec")
    parser.add_argument("--dataset", "-d", default="demo", help="dataset folder name under data_path")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--nproc", type=int, default=1, help="processes (ranks) on this machine")
    parser.add_argument("--world_size", type=int, default=-1, help="ranks on all machines (default nproc)")
    parser.add_argument("--ip", default="localhost", help="address of rank 0's machine")
    parser.add_argument("--port", type=int, default=None,
                        help="port on rank 0's machine (one machine: default a free one)")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank of this machine's first process")
    args, overrides = parser.parse_known_args(argv)
    config_files = args.config_files.split() if args.config_files else None
    result = run_recbole_iisan_ddp(model=args.model, dataset=args.dataset, config_file_list=config_files,
                                   cmd_args=overrides, nproc=args.nproc, world_size=args.world_size,
                                   ip=args.ip, port=args.port, group_offset=args.group_offset)
    print(f"test result: {result['test_result']}")
    return result


if __name__ == "__main__":
    main()
