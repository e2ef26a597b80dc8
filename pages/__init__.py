"""Streamlit pages, one per view; UI only."""
