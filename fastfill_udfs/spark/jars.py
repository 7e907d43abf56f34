"""Delta Lake JVM jars: resolve them once from Maven Central into a project-local cache and
write a `spark-defaults.conf` so that `python pipelines/x.py` and plain `spark-submit
pipelines/x.py` both start Spark with Delta's SQL extension and catalog, and a quiet
`log4j2.properties` (Spark at WARN) so that they print the job's own lines.

Run ``python -m fastfill_udfs.spark.jars`` (scripts/setup.sh does it) to fetch and wire the jars.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastfill_udfs.config import PROJECT_ROOT

SETUP_COMMAND = "bash scripts/setup.sh"
JAR_CACHE = Path(os.environ.get("FASTFILL_JAR_CACHE", PROJECT_ROOT / ".cache" / "ivy"))
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


def delta_maven_coordinate() -> str:
    """The Maven coordinate of delta-spark matching the installed pyspark and delta-spark."""
    from importlib.metadata import version

    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"


def cached_jars(cache: Path = JAR_CACHE) -> list[Path]:
    """The resolved jars (Delta and its dependencies) in the cache, sorted; [] when not fetched."""
    jar_dir = cache / "jars"
    return sorted(jar_dir.glob("*.jar")) if jar_dir.is_dir() else []


def delta_jars_present(cache: Path = JAR_CACHE) -> bool:
    coord = delta_maven_coordinate()
    _, artifact, ver = coord.split(":")
    return any(p.name == f"io.delta_{artifact}-{ver}.jar" for p in cached_jars(cache))


def missing_jars_message() -> str:
    return (
        f"Delta Lake jars ({delta_maven_coordinate()}) are not in {JAR_CACHE / 'jars'}. "
        f"Run `{SETUP_COMMAND}` (or `python -m fastfill_udfs.spark.jars`) to fetch them from "
        "Maven Central. This project never falls back to plain Parquet."
    )


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def delta_spark_conf(cache: Path = JAR_CACHE) -> dict[str, str]:
    """Spark settings that enable Delta with the cached jars."""
    return {
        "spark.jars": ",".join(str(p) for p in cached_jars(cache)),
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
    }


def fetch_delta_jars(cache: Path = JAR_CACHE) -> list[Path]:
    """Resolve delta-spark and its dependencies with Spark's own Ivy into `cache`.

    Raises RuntimeError with spark-submit's output when resolution fails."""
    cache.mkdir(parents=True, exist_ok=True)
    coord = delta_maven_coordinate()
    submit = spark_home() / "bin" / "spark-submit"
    with tempfile.TemporaryDirectory() as tmp:
        noop = Path(tmp) / "noop.py"
        noop.write_text("")
        env = {**os.environ, "SPARK_CONF_DIR": tmp}  # ignore a possibly stale spark-defaults
        proc = subprocess.run(
            [str(submit), "--master", "local[1]", "--packages", coord,
             "--conf", f"spark.jars.ivy={cache}", str(noop)],
            capture_output=True, text=True, env=env,
        )
    if proc.returncode != 0 or not delta_jars_present(cache):
        raise RuntimeError(
            f"could not resolve {coord} from Maven Central into {cache}:\n"
            + proc.stdout[-3000:] + proc.stderr[-3000:]
        )
    return cached_jars(cache)


def write_spark_defaults(cache: Path = JAR_CACHE) -> Path:
    """Write <pyspark>/conf/spark-defaults.conf enabling Delta with the cached jars.

    The venv's pyspark is SPARK_HOME for both `python` and its `spark-submit`."""
    if not delta_jars_present(cache):
        raise FileNotFoundError(missing_jars_message())
    conf_dir = spark_home() / "conf"
    conf_dir.mkdir(exist_ok=True)
    path = conf_dir / "spark-defaults.conf"
    lines = ["# Written by fastfill_udfs.spark.jars (scripts/setup.sh); rerun it to refresh."]
    lines += [f"{k}  {v}" for k, v in delta_spark_conf(cache).items()]
    # plain `spark-submit` (venv not activated) runs the driver and workers on this
    # interpreter, which has the project's packages, not on whatever `python3` is on PATH
    lines += [f"spark.pyspark.python  {sys.executable}",
              f"spark.pyspark.driver.python  {sys.executable}"]
    path.write_text("\n".join(lines) + "\n")
    return path


LOG4J2_MARKER = "# Written by fastfill_udfs.spark.jars"
LOG4J2_PROPERTIES = LOG4J2_MARKER + """ (scripts/setup.sh); rerun it to refresh.
# Spark, Hadoop, Delta and their libraries log at WARN, so what spark-submit prints is the
# job's own progress (the project's Python loggers log INFO to stdout, see cli.setup_logging).
# Spark's INFO lines back: --set spark.log_level=INFO (from the session's start on), or move
# this file away (everything, JVM start-up included).
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console

appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex

# One-line warnings every local run prints and nobody can act on
logger.nativecode.name = org.apache.hadoop.util.NativeCodeLoader
logger.nativecode.level = error
logger.loopback.name = org.apache.spark.util.Utils
logger.loopback.level = error
logger.metrics.name = org.apache.hadoop.metrics2
logger.metrics.level = error

# The Python UDF workers' and py4j's own stderr lines stay visible
logger.pythonrunner.name = org.apache.spark.api.python.PythonRunner
logger.pythonrunner.level = warn
"""


def write_log4j2(conf_dir: Path | None = None) -> Path | None:
    """Write `log4j2.properties` (LOG4J2_PROPERTIES: Spark at WARN) next to spark-defaults.conf
    in the venv's SPARK_HOME conf (or `conf_dir`), where spark-submit and pyspark's launcher
    put it on the JVM's classpath. A file the user wrote there (without our marker line) is
    kept; returns None then, else the path."""
    conf_dir = Path(conf_dir) if conf_dir is not None else spark_home() / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "log4j2.properties"
    if path.exists() and not path.read_text().startswith(LOG4J2_MARKER):
        return None
    path.write_text(LOG4J2_PROPERTIES)
    return path


def main() -> int:
    if delta_jars_present():
        print(f"Delta jars already cached in {JAR_CACHE / 'jars'}")
    else:
        print(f"Fetching {delta_maven_coordinate()} from Maven Central into {JAR_CACHE} ...")
        fetch_delta_jars()
    print(f"  {len(cached_jars())} jars, Delta: {delta_maven_coordinate()}")
    print(f"Wrote {write_spark_defaults()}")
    log4j2 = write_log4j2()
    print(f"Wrote {log4j2} (Spark logs at WARN; --set spark.log_level=INFO for its INFO lines)"
          if log4j2 else f"Kept your own {spark_home() / 'conf' / 'log4j2.properties'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
