"""Helpers the tests share: small models, live servers and fleets, network namespaces, Ray."""
