"""Verification: the published 10-fold protocol, embedding extraction, the .bin targets and their
decode cache. Imports the parts and utils/."""
