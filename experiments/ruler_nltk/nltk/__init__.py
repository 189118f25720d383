"""A stand-in for the one part of nltk that RULER's niah generator uses (sent_tokenize): nltk's
punkt model is not packaged, so eval_ruler.py puts this folder first on the generator's
PYTHONPATH. Never on the path of anything else."""
