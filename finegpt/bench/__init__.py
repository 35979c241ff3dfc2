"""`finegpt bench`: each section (loader, kernels, train) measures one claim side by side in one
process and returns a SectionResult; `report` turns the sections into JSON, Markdown and charts."""
