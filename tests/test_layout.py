"""Project-wide rules: layer import direction, no work at import time, and packaging files that agree."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each layer may import only from the layers before it (STYLE.md).
LAYERS = ['dnnlib', 'torch_utils', 'training', 'metrics']
FORBIDDEN = {
    'dnnlib': {'torch_utils', 'training', 'metrics', 'torch'},
    'torch_utils': {'training', 'metrics'},
    'training': {'metrics'},
    'metrics': set(),
}
RUNTIME_REQUIREMENTS = ['torch', 'numpy', 'click', 'pillow', 'scipy', 'requests', 'psutil', 'ninja']


def _python_files(package):
    root = os.path.join(REPO_ROOT, package)
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            if filename.endswith('.py'):
                yield os.path.join(dirpath, filename)


def _imported_top_level_names(path):
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split('.')[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split('.')[0]


@pytest.mark.parametrize('package', LAYERS)
def test_layers_import_only_downwards(package):
    if not os.path.isdir(os.path.join(REPO_ROOT, package)):
        pytest.skip(f'{package}/ does not exist yet')
    offenders = []
    for path in _python_files(package):
        bad = FORBIDDEN[package] & set(_imported_top_level_names(path))
        if bad:
            offenders.append(f'{os.path.relpath(path, REPO_ROOT)} imports {sorted(bad)}')
    assert offenders == []


def test_importing_the_packages_does_no_work(tmp_path):
    # No compilation, no CUDA initialization, no cache directories, no downloads at import time.
    code = textwrap.dedent('''
        import importlib, json, os, pkgutil, sys
        import torch
        names = []
        for package in ['dnnlib', 'torch_utils']:
            module = importlib.import_module(package)
            names.append(package)
            for info in pkgutil.walk_packages(module.__path__, package + '.'):
                importlib.import_module(info.name)
                names.append(info.name)
        print(json.dumps(dict(names=names, cuda_initialized=torch.cuda.is_initialized(),
                              cache_contents=os.listdir(os.environ['DNNLIB_CACHE_DIR']))))
    ''')
    cache_dir = tmp_path / 'cache'
    cache_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, DNNLIB_CACHE_DIR=str(cache_dir), TORCH_EXTENSIONS_DIR=str(cache_dir))
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert 'torch_utils.persistence' in out['names'] and 'torch_utils.custom_ops' in out['names']
    assert out['cuda_initialized'] is False
    assert out['cache_contents'] == []


def test_requirements_list_the_runtime_dependencies():
    lines = open(os.path.join(REPO_ROOT, 'requirements.txt')).read().splitlines()
    names = [re.split(r'[<>=!~\[ ]', line.strip())[0].lower() for line in lines if line.strip() and not line.startswith('#')]
    assert sorted(names) == sorted(RUNTIME_REQUIREMENTS)
    test_lines = open(os.path.join(REPO_ROOT, 'requirements-test.txt')).read().split()
    assert '-r' in test_lines and 'pytest' in test_lines
    env_file = open(os.path.join(REPO_ROOT, 'environment.yml')).read()
    pip_section = env_file.split('- pip:', 1)[1]
    for name in RUNTIME_REQUIREMENTS + ['pytest']:
        assert re.search(rf'-\s+{name}\b', pip_section), f'{name} missing from environment.yml pip section'
    for banned in ['torchvision', 'distutils', 'pkg_resources']:
        assert banned not in env_file and banned not in ' '.join(lines)


def test_no_banned_modules_in_the_code():
    offenders = []
    for package in LAYERS + ['tests']:
        if not os.path.isdir(os.path.join(REPO_ROOT, package)):
            continue
        for path in _python_files(package):
            if path == os.path.abspath(__file__):
                continue
            bad = {'distutils', 'pkg_resources', 'torchvision'} & set(_imported_top_level_names(path))
            if bad:
                offenders.append(f'{os.path.relpath(path, REPO_ROOT)}: {sorted(bad)}')
    assert offenders == []


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO_ROOT, 'README.md')).read()
    ci = open(os.path.join(REPO_ROOT, '.ci', 'run')).read()
    block = re.search(r'```bash\n(.*?)```', readme, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith('#')]
    # Exactly two set-up commands up front: the end-to-end quickstart, then the tests.
    assert len(commands) == 2, commands
    assert commands[0] == 'bash quickstart.sh' and os.path.isfile(os.path.join(REPO_ROOT, 'quickstart.sh'))
    install, test = [part.strip() for part in commands[1].split('&&')]
    assert test in ci, f'.ci/run does not run the README test command "{test}"'
    assert install.replace('pip install', 'python -m pip install --quiet --disable-pip-version-check') \
        .replace('torch==2.13.0', '"torch==2.13.0"') in ci


def test_pyproject_registers_the_markers():
    text = open(os.path.join(REPO_ROOT, 'pyproject.toml')).read()
    assert '"cuda:' in text and '"slow:' in text
    json.dumps(text)  # Plain text, nothing to evaluate.
