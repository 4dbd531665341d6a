"""Packaging for chatnet: a replicated chat service (standard library only at run time)."""
from setuptools import find_packages, setup

setup(
    name="chatnet",
    version="0.1.0",
    description="A persistent, fault-tolerant replicated chat service speaking the CS262 wire protocol",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["chatnet", "chatnet.*"]),
    install_requires=[],
    extras_require={
        "test": ["pytest", "pexpect", "pyte", "hypothesis", "pytest-timeout", "ruff"],
        "dev": ["py-spy"],
    },
    entry_points={
        "console_scripts": [
            "chatserver=chatnet.server.cli:main",
            "chatclient=chatnet.client.cli:main",
        ],
    },
)
