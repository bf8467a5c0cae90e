"""models.composer as a package: one job per module, the public names in one place, torch only when
a torch name is used, and an install hint when an optional package is missing."""

import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_package_imports_without_torch_and_lists_lazy_names():
    code = ("import sys, latentcast.models.composer as c\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
            "print(sorted(set(c.__all__) - set(dir(c))))\n"
            "print(c.make_composer.__module__, c.caption_for(['car', 'person', 'person']))\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "False False"
    assert lines[1] == "[]"  # every public name is listed by dir(), the lazy ones too
    assert lines[2] == "latentcast.models.composer.base a photo of a car, two persons"


def test_lazy_names_are_module_level_classes_and_functions():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import latentcast.models.composer as c

    where = {"LatentAdapter": "adapter", "ControlNetComposer": "controlnet", "load_components": "loading",
             "save_components": "loading", "tiny_components": "loading", "tiny_clip_tokenizer": "loading",
             "LatentDecoderComposer": "latent_decoder", "ComposeRequest": "base", "seed_for": "captions"}
    for name, module in where.items():
        obj = getattr(c, name)
        assert obj.__module__ == f"latentcast.models.composer.{module}", name
        assert "<locals>" not in obj.__qualname__, name  # defined at module level, not built in a function
    from latentcast.models.composer.adapter import LatentAdapter

    assert c.LatentAdapter is LatentAdapter  # one class, however it is imported
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchComposer'"):
        c.NoSuchComposer  # noqa: B018


@pytest.mark.parametrize(
    "blocked, module, hint",
    [
        ("diffusers", "loading", 'pip install -e ".[sd]"'),
        ("transformers", "loading", 'pip install -e ".[sd]"'),
        ("torch", "adapter", 'pip install -e ".[cloud]"'),
    ],
)
def test_missing_optional_package_says_what_to_install(blocked, module, hint):
    # sys.modules[name] = None makes `import name` raise ImportError, as on a machine without it
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "import latentcast.models.composer as c\n"
            f"try:\n    import latentcast.models.composer.{module}\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ImportError:") and hint in r.stdout, r.stdout


def test_make_composer_rejects_unknown_kind_without_torch():
    r = _run("import sys, latentcast.models.composer as c\n"
             "try:\n    c.make_composer('gan')\nexcept ValueError as e:\n    print(e)\n"
             "print('torch' in sys.modules)\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["unknown composer kind 'gan'; valid kinds: none, controlnet", "False"]
