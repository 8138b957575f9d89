"""
Run part of the suite against the oldest versions of mailgate's
dependencies that setup.cfg allows, as a packager or an administrator
installing into an existing environment may have them:

    .venv/bin/python tests/depfloors.py            # each at exactly its floor
    .venv/bin/python tests/depfloors.py --latest   # each at its newest release

Why: pip installs the newest release of each dependency, so the suite in
.venv never meets the floors setup.cfg declares, and a floor below the
version that brought an API mailgate uses (or fixed a bug it relies on)
goes unnoticed until someone installs it.  This makes a virtual
environment under --dir (Debian's Python 3.11 where there is one, as the
Makefile does), installs every requirement of setup.cfg (install_requires
and the postgres and test extras) at exactly its floor, the packages they
bring as pip resolves them, and mailgate itself from C{git archive HEAD}
(committed work only) without dependencies; then runs the chosen test
files there, with PostgreSQL started as for make test.  The end-to-end
tests spawn the twistd and mailgate scripts beside the interpreter that
runs them (tests/e2e.py), so they test that environment's install.  It
prints the versions installed, and exits with pytest's status.

Not part of make test: it downloads and builds for a few minutes.  The
floors and their reasons are in README's Dependencies table, which
tests/test_dependencies.py keeps equal to setup.cfg and the Makefile.
"""

import argparse
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Test files that exercise every dependency: Twisted's internals
#: (twistedcompat), TLS (cryptography, and service-identity under Twisted's
#: TLS client), foreign password hashes (passlib, bcrypt, argon2-cffi),
#: metrics (prometheus-client), address normalisation (idna), OAuth 2.0
#: access tokens (PyJWT), PostgreSQL
#: (psycopg: its refusals, its answer deadline), and the installed server
#: end to end.
DEFAULT_TESTS = [
    "tests/test_twistedcompat.py", "tests/test_tls.py", "tests/test_tlslayer.py",
    "tests/test_metrics.py", "tests/test_auth.py", "tests/test_foreign_hashes.py",
    "tests/test_sasl.py", "tests/test_config.py", "tests/test_recipient_delimiter.py",
    "tests/test_pop3_protocol.py", "tests/test_smtp_protocol.py", "tests/test_e2e_pop3.py",
    "tests/test_e2e_smtp.py", "tests/test_e2e_tls.py", "tests/test_e2e_sasl.py",
    "tests/test_serve.py", "tests/test_tap.py", "tests/test_store.py", "tests/test_pgreactor.py",
    "tests/test_pgrefusal.py", "tests/test_pgsilence.py", "tests/test_observability.py",
    "tests/test_cli.py", "tests/test_schema.py", "tests/test_service.py", "tests/test_testing.py",
    "tests/test_session.py", "tests/test_smtp_data.py", "tests/test_importers.py",
    "tests/test_logs.py", "tests/test_passwdfile.py", "tests/test_imported_cram.py", "tests/test_oauth.py",
]

#: What the suite's own builds of mailgate need in the environment
#: (test_serve and test_e2e_pop3 build it with --no-build-isolation), at
#: the Makefile's floor.
BUILD_TOOLS = ["setuptools==68.0.0", "wheel==0.41.0"]

REQUIREMENT = re.compile(r"([A-Za-z0-9_.-]+)(\[[A-Za-z0-9_,.-]+\])?>=([0-9][0-9A-Za-z.]*)")


def requirements(setupCfg=REPO / "setup.cfg"):
    """
    The requirements setup.cfg declares (install_requires, then each
    extra's, each once) as (name, extras, floor) triples.

    @raise ValueError: for a requirement that is not C{name[extras]>=floor}
        alone (no upper bound, no exclusion, no marker): the one form this
        and the README's table know.
    """
    config = configparser.ConfigParser()
    config.read(setupCfg, encoding="utf-8")
    lines = config["options"]["install_requires"].split("\n")
    for extra in config["options.extras_require"].values():
        lines += extra.split("\n")
    found = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = REQUIREMENT.fullmatch(line)
        if match is None:
            raise ValueError(f"setup.cfg: {line!r} is not name>=floor")
        name, extras, floor = match.groups()
        key = normalised(name)
        if key in found and found[key][2] != floor:
            raise ValueError(f"setup.cfg: {name} has two floors, {found[key][2]} and {floor}")
        found[key] = (name, extras or "", floor)
    return list(found.values())


def normalised(name):
    """A distribution's name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pythonForVenv():
    """Debian's Python 3.11 where it can make a venv, else this one (as the Makefile picks)."""
    debian = "/usr/bin/python3.11"
    if os.access(debian, os.X_OK):
        probe = subprocess.run([debian, "-c", "import ensurepip, venv"], capture_output=True)
        if probe.returncode == 0:
            return debian
    return sys.executable


def run(command, **kwargs):
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latest", action="store_true", help="each dependency at its newest release, not its floor")
    parser.add_argument("--dir", default="/tmp/mailgate-depfloors", help="made anew: the venv and the source copy")
    parser.add_argument("--python", default=None, help="the interpreter the venv is made from")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers")
    parser.add_argument("tests", nargs="*", default=DEFAULT_TESTS, help="test files (default: a subset using every dependency)")
    args = parser.parse_args(argv)

    declared = requirements()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    source, venv = work / "src", work / "venv"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    run([args.python or pythonForVenv(), "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    operator = ">=" if args.latest else "=="
    pins = [f"{name}{extras}{operator}{floor}" for name, extras, floor in declared]
    run([python, "-m", "pip", "install", "--quiet", *pins, *BUILD_TOOLS])
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(source)], cwd=source)
    shutil.rmtree(source / "build", ignore_errors=True)

    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], check=True, capture_output=True, text=True)
    installed = {normalised(p["name"]): p["version"] for p in json.loads(listed.stdout)}
    print(f"\n{'requirement':<28} {'floor':<10} installed")
    for name, extras, floor in declared:
        print(f"{name + extras:<28} {floor:<10} {installed.get(normalised(name), 'missing')}")
    print("others:", ", ".join(f"{n} {v}" for n, v in sorted(installed.items())
                               if n not in {normalised(d[0]) for d in declared}), "\n", flush=True)

    # PostgreSQL as for make test (tests/pgserver.py prints shell
    # assignments), then the tests from the source copy, whose mailgate is
    # the one installed.
    script = (
        f'eval "$({python} tests/pgserver.py)" || exit 1; '
        f'exec {python} -m pytest -q -p no:cacheprovider -n {args.workers} "$@"'
    )
    result = subprocess.run(["sh", "-c", script, "sh", *args.tests], cwd=source)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
