"""FastFill backfill pipeline on Apache Spark: package `fastfill_udfs`.

Pins are the newest mutually compatible versions whose Delta jars resolve from Maven Central
(delta-spark 4.4.1's jars are not published; 4.4.0 with pyspark 4.2.0 is). `constraints.txt`
pins the transitive dependencies for reproducible installs (`scripts/setup.sh` uses it).
"""
from setuptools import find_packages, setup

setup(
    name="fastfill-udfs",
    version="0.1.0",
    description="FastFill: uncertainty-ordered partial backfilling of embedding galleries on Spark",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastfill_udfs", "fastfill_udfs.*"]),
    package_data={"fastfill_udfs": ["py.typed"]},
    install_requires=[
        "pyspark==4.2.0",
        "delta-spark==4.4.0",
        "pandas>=2.2,<3",          # Spark 4.2 does not support pandas 3
        "pyarrow>=18,<26",
        "numpy>=2,<3",
        "torch>=2.8,<2.16",
        "torchvision>=0.29,<0.31",  # ResNet-style models, GPU (nvJPEG) decoding; needs torch>=2.14
        "faiss-cpu==1.15.1",
        "mlflow>=3.10,<4",
        "pyyaml>=6",
        "matplotlib>=3.8",
        "pillow>=10",
        "deltalake>=1.6,<2",       # reads Delta image tables without a JVM (data/images.py)
    ],
    extras_require={
        "dev": ["pytest>=8", "scikit-learn>=1.5"],
        "bench": ["psutil>=5.9"],
        # the Databricks bundle's typed schema (tests/test_bundle.py loads databricks.yml in it)
        "databricks": ["databricks-bundles>=1.22,<2"],
    },
)
