#!/usr/bin/env bash
# The Airflow smoke matrix: for each supported Airflow minor (latest patch), a fresh virtualenv with that
# Airflow and the provider without extras, then tests/matrix/smoke_airflow.py (ProvidersManager
# registration, a sync and a deferrable Seedance task, sora-character and the sensor through dag.test()
# against the simulator). Prints a Markdown table of what passed (the README's "Tested with" comes from it)
# and fails if any version fails or runs no test.
#
#   .ci/airflow_matrix.sh              # every supported version
#   .ci/airflow_matrix.sh 3.1.8        # only these
#
# uv's one download cache (UV_CACHE_DIR, default ~/.cache/uv) is shared by all versions and runs.
set -euo pipefail
cd "$(dirname "$0")/.."

SUPPORTED=(3.0.6 3.1.8 3.2.2 3.3.2)
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=("${SUPPORTED[@]}")

# Releases whose own pins let a plain install pull fastapi/svcs versions that break Airflow itself.
pins_for() {
    case "$1" in
        3.0.*) echo "fastapi<0.118 universal-pathlib<0.3" ;;
        3.2.*) echo "fastapi<0.137 svcs<26.2" ;;
        *) echo "" ;;
    esac
}

if [[ ! -x .venv/bin/uv ]]; then
    python3 -m venv .venv
    .venv/bin/pip install -q uv
fi
uv=.venv/bin/uv
python=$(command -v python3)

rows=()
failed=0
for version in "${versions[@]}"; do
    venv=".venv-airflow-$version"
    started=$SECONDS
    echo "=== Airflow $version: installing into $venv"
    # shellcheck disable=SC2046  # the pins are separate words
    if "$uv" venv -q --clear --python "$python" "$venv" \
        && "$uv" pip install -q --python "$venv/bin/python" \
            "apache-airflow==$version" $(pins_for "$version") . pytest pytest-timeout wtforms; then
        installed=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("apache-airflow"))')
        python_version=$("$venv/bin/python" -c 'import platform; print(platform.python_version())')
        echo "=== Airflow $installed on Python $python_version: smoke test"
        set +e
        "$venv/bin/python" -m pytest -q -p no:cacheprovider --timeout 300 tests/matrix/smoke_airflow.py
        status=$?
        set -e
        if [[ $installed != "$version" ]]; then
            echo "asked for Airflow $version, got $installed"
            status=1
        fi
    else
        installed="$version (install failed)"
        python_version=$("$python" -c 'import platform; print(platform.python_version())')
        status=1
    fi
    # pytest exits 5 when it collected no test: that is a failure here, not a pass.
    if [[ $status -eq 0 ]]; then result=passed; else result="FAILED (exit $status)"; failed=1; fi
    rows+=("| $installed | $python_version | $result | $((SECONDS - started)) s |")
done

echo
echo "| Airflow | Python | smoke test | time |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit "$failed"
