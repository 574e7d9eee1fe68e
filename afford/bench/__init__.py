"""afford bench: fidelity of the lossy levers against the plain large model (fidelity.py), on GSM8K and a fact-QA set (factqa.py)."""
