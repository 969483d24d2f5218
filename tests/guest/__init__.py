"""The test guest: a small real Linux guest built from Debian packages, booted by tests."""
