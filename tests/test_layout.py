"""The shape of the project: two layers (a library of concepts; scripts that import it and never
each other), one concept per file, lines a reader sees whole, and the dependencies each layer
may use."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ('vit', 'resnet', 'moco', 'simclr_byol', 'lars_lamb', 'data', 'augment', 'evaluation',
           'checkpoint', 'launch', 'recipes')
SCRIPTS = ('train_pretrain', 'train_linear', 'train_finetune', 'bench')
STDLIB_AND_TORCH = {'argparse', 'ast', 'copy', 'functools', 'io', 'json', 'math', 'os', 'random',
                    'resource', 'shutil', 'statistics', 'sys', 'time', 'warnings', 'torch',
                    'dataclasses',
                    'torchvision', 'numpy', 'tqdm', 'PIL', 'contextlib', 'collections',
                    'scipy'}  # scipy: optional, checked by data.py for Flowers-102 (torchvision's)


def source(path):
    return open(os.path.join(ROOT, path)).read()


def imports(path):
    """Top-level names of every module `path` imports (anywhere in the file)."""
    names = set()
    for node in ast.walk(ast.parse(source(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split('.')[0])
    return names


def test_top_level_holds_the_library_and_the_scripts_only():
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    assert modules == set(LIBRARY) | set(SCRIPTS)
    assert not modules & {'utils', 'common', 'helpers'}


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_import_the_library_never_each_other(script):
    own = imports(f'{script}.py') & (set(LIBRARY) | set(SCRIPTS))
    assert own and own <= set(LIBRARY), own


@pytest.mark.parametrize('module', LIBRARY)
def test_library_never_imports_a_script_nor_matplotlib(module):
    used = imports(f'{module}.py')
    assert not used & set(SCRIPTS) and 'matplotlib' not in used, used
    assert used - set(LIBRARY) <= STDLIB_AND_TORCH, used - set(LIBRARY) - STDLIB_AND_TORCH


def test_model_files_need_torch_only():
    for model in ('vit.py', 'resnet.py'):
        assert imports(model) - {'torch', 'math', 'functools'} == set(), imports(model)


def test_matplotlib_is_imported_by_the_plotting_code_only():
    users = [path for path in (
        [f for f in os.listdir(ROOT) if f.endswith('.py')]
        + [os.path.join('labs', f) for f in os.listdir(os.path.join(ROOT, 'labs'))
           if f.endswith('.py')]) if 'matplotlib' in imports(path)]
    assert sorted(users) == [os.path.join('labs', 'look.py'), os.path.join('labs', 'plot.py')]


def test_labs_run_the_scripts_and_import_none():
    for f in os.listdir(os.path.join(ROOT, 'labs')):
        if f.endswith('.py'):
            assert not imports(os.path.join('labs', f)) & set(SCRIPTS), f


def test_lines_are_at_most_100_characters():
    """The library, the scripts, the labs and the tests: lines a reader sees whole."""
    files = ([f for f in os.listdir(ROOT) if f.endswith('.py')]
             + [os.path.join(d, f) for d in ('labs', 'tests', 'tools')
                for f in os.listdir(os.path.join(ROOT, d)) if f.endswith('.py')])
    for path in files:
        long = [i + 1 for i, line in enumerate(source(path).splitlines()) if len(line) > 100]
        assert not long, (path, long)
