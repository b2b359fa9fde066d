"""Tools around a federation that no federation imports: the recipe of the built-in backbone
(`fedlrm pretrain`), a local Flower deployment supervisor (`fedlrm flower`, the tests and the
benchmarks) and the test certificates and keys it needs."""
