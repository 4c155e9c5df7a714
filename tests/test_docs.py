"""The documentation: strict build, complete API reference, and the playground in a browser."""

import functools
import http.server
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import bayesopt_jax as bj

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_api_reference_lists_every_public_name():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in bj.__all__:
        assert f"::: bayesopt_jax.{name}\n" in api, name


@pytest.mark.subprocess
def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("latex2mathml")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for page in ["index.html", "sigma-filter.html", "api.html", "playground/index.html"]:
        assert (site / page).exists(), page
    api = (site / "api.html").read_text(encoding="utf-8")
    for name in bj.__all__:
        assert f'id="bayesopt_jax.{name}"' in api, name
    # math is MathML produced at build time; no page loads anything from elsewhere
    assert "<math" in (site / "sigma-filter.html").read_text(encoding="utf-8")
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for marker in (
            'src="http',
            "src='http",
            'href="https://fonts',
            "cdn.jsdelivr",
            "unpkg.com",
        ):
            assert marker not in text, (page, marker)


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver are not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver_path), options=options)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = functools.partial(_QuietHandler, directory=str(DOCS / "playground"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.browser
def test_playground_in_a_headless_browser(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(f"{server}/index.html")
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.body.dataset.ready") == "1"
        )
        canvas = driver.find_element(By.ID, "plot")

        def snapshot():
            return (
                driver.execute_script("return arguments[0].toDataURL()", canvas),
                driver.find_element(By.ID, "info").text,
                canvas.get_attribute("data-key"),
            )

        before = snapshot()
        assert "steps" in before[1] and before[2]
        driver.save_screenshot(str(tmp_path / "before.png"))

        slider = driver.find_element(By.ID, "lr")
        slider.click()
        slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)  # a real key press on the slider
        after = snapshot()
        assert after[2] != before[2], "the slider did not change the selected trajectory"
        assert after[0] != before[0], "the plot did not change"
        assert after[1] != before[1]

        driver.find_element(By.ID, "fn").send_keys(Keys.ARROW_DOWN)  # another function
        assert snapshot()[0] != after[0]
        assert driver.save_screenshot(str(tmp_path / "after.png"))
        assert (tmp_path / "after.png").stat().st_size > 10_000

        # every resource came from the local server: no external requests
        urls = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert urls and all(u.startswith(server) for u in urls), urls
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def _snippets(page: Path, fence: str = "```python") -> list[tuple[int, str]]:
    """The ```python (or ``fence``) blocks of a page: (line number, code)."""
    out, lines, start, block = [], page.read_text(encoding="utf-8").splitlines(), None, []
    for i, line in enumerate(lines, start=1):
        if start is None and line.strip() == fence:
            start, block = i, []
        elif start is not None and line.strip() == "```":
            out.append((start, "\n".join(block)))
            start = None
        elif start is not None:
            block.append(line)
    return out


PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
PAGES_WITH_CODE = [p for p in PAGES if _snippets(p) or _snippets(p, "```pycon")]


@pytest.mark.slow  # every page's code, some of it training loops
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_snippet_runs(page, tmp_path, monkeypatch):
    """Each page's Python blocks run in order in one namespace, as a reader would paste them.

    A block that starts with ``# not run here:`` (a multi-host launch) is only compiled.
    """
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    for line, code in _snippets(page):
        # a block inside a list item is indented with the item
        compiled = compile(textwrap.dedent(code), f"{page.name}:{line}", "exec")
        if code.lstrip().startswith("# not run here:"):
            continue
        exec(compiled, namespace)
    # interpreter transcripts run as doctests
    import doctest

    for line, code in _snippets(page, "```pycon"):
        test = doctest.DocTestParser().get_doctest(code + "\n", {}, page.name, str(page), line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.failures == 0, f"{page.name}:{line}: transcript does not reproduce"
