"""Front ends: the `kvlens` command line, and the Streamlit app's entry point, state and figures."""
