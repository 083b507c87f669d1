"""The README and docs/ pages: every relative link and image resolves (anchors included), no
path points outside the repository, and the README stays a page a newcomer reads in minutes."""

import re

LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def pages(repo_root):
    return [repo_root / "README.md", *sorted((repo_root / "docs").glob("*.md"))]


def anchors(page):
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_and_image_resolves(repo_root):
    for page in pages(repo_root):
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target}"
            assert repo_root in resolved.parents or resolved == repo_root, f"{page.name}: {target} leaves the repo"
            if anchor:
                assert anchor in anchors(resolved), f"{page.name}: {target}: no such heading"


def test_no_page_points_outside_the_repository_or_at_the_source_texts(repo_root):
    for page in pages(repo_root):
        text = page.read_text()
        assert "../shared" not in text and "seeds/00" not in text, page.name
        assert not re.search(r"\bseed 00\d\b", text), page.name


def test_the_readme_is_short_and_shows_the_two_commands(repo_root):
    readme = (repo_root / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make run-experiment" in readme and "make test" in readme


def test_the_config_files_shown_in_the_docs_load(repo_root, tmp_path):
    """Each ```toml block that is a whole config (it has an [experiment] table) is one a
    reader can copy: it loads as the suite would load it."""
    from experiments.config import load_config

    shown = [block for page in pages(repo_root)
             for block in re.findall(r"```toml\n(.*?)```", page.read_text(), re.S) if "[experiment]" in block]
    assert shown, "docs/run-directory.md shows one"
    for number, block in enumerate(shown):
        path = tmp_path / f"shown_{number}.toml"
        path.write_text(block)
        load_config(str(path))


def test_the_diagnosis_rule_shown_is_the_one_the_code_applies(repo_root):
    """docs/diagnosis.md shows gradtools.diagnosis.RULES as they are, and each rule's source
    is a paragraph of that page."""
    from gradtools.diagnosis import RULES, rules_table

    page = (repo_root / "docs" / "diagnosis.md").read_text()
    assert rules_table() in page, "regenerate the table with gradtools.diagnosis.rules_table()"
    for rule in RULES:
        assert f"**{rule.source}.**" in page, rule
