"""What ``import fastvat`` costs: no benchmark or Hugging Face dependency, and no compiler run."""
import ast
import os
import subprocess
import sys
import textwrap

HEAVY = ("matplotlib", "sklearn", "tqdm", "transformers", "scipy")


def _python(code, **env):
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip().splitlines()[-1]


def _loaded_after(module):
    return ast.literal_eval(_python(f"import {module}, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"))


def test_import_fastvat_pulls_in_no_heavy_module():
    loaded = _loaded_after("fastvat")
    # torch.hub imports tqdm whenever it is installed: that one is torch's doing, not fastvat's
    if loaded == ["tqdm"]:
        assert _loaded_after("torch") == ["tqdm"]
    else:
        assert loaded == []


def test_missing_kernels_fall_back_without_compiling():
    out = _python(
        """
        import sys, warnings
        import torch.utils.cpp_extension as ce

        class NoCompiledModule:  # as if fastvat._C had never been built
            def find_spec(self, name, path=None, target=None):
                if name == "fastvat._C":
                    raise ImportError("hidden by the test")

        def no_build(*args, **kwargs):
            raise AssertionError("import fastvat started a JIT build")

        sys.meta_path.insert(0, NoCompiledModule())
        ce.load = no_build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastvat
        ours = [w for w in caught if "fastvat" in str(w.message)]
        assert len(ours) == 1 and "FASTVAT_JIT=1" in str(ours[0].message), [str(w.message) for w in caught]
        print(fastvat.extension_info()["backend"])
        """,
        FASTVAT_JIT="", FASTVAT_BACKEND="",
    )
    assert out == "reference"


def test_submodules_are_reachable_after_import_fastvat_without_importing_transformers():
    """fastvat.inplace and fastvat.integrations load on first access (PEP 562); neither that nor
    ``import fastvat`` imports transformers (only fastvat.integrations.huggingface does)."""
    out = _python(
        """
        import sys, fastvat
        before = "transformers" in sys.modules
        ok = fastvat.inplace.ExactPerturbation.__name__ == "ExactPerturbation"
        ok = ok and fastvat.integrations.__name__ == "fastvat.integrations" and "inplace" in dir(fastvat)
        print(before, "transformers" in sys.modules, ok)
        """
    )
    assert out == "False False True"
