"""The installed package finds its yaml: from a built wheel, not only from the checkout."""
import os
import subprocess
import sys
import textwrap
import zipfile

from conftest import REPO

CHECK = textwrap.dedent("""
    import sys, recbole_iisan
    from recbole_iisan.config import Config, properties_dir
    assert recbole_iisan.__file__.startswith(sys.argv[1]), recbole_iisan.__file__
    assert str(properties_dir()).startswith(sys.argv[1]), properties_dir()
    c = Config("SASRec", "demo", config_dict={"data_path": sys.argv[2]}, cmd_args=[])
    print(c["train_protocol"], c["user_inter_num_interval"], c["cache_dtype"])
""")


def test_wheel_carries_properties_and_loads_a_config(tmp_path):
    wheel_dir, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheel_dir)],
        capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("recbole_iisan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "recbole_iisan/properties/overall.yaml" in names
    assert "recbole_iisan/properties/dataset/demo.yaml" in names

    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # Run from an unrelated folder with the wheel's copy first on the path.
    env = dict(os.environ, PYTHONPATH=str(target))
    check = subprocess.run([sys.executable, "-c", CHECK, str(target), str(REPO / "dataset")],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split()[-3:] == ["recbole", "[5,inf)", "float16"]
