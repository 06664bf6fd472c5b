"""Pages for people: the radiologists' reading worklist and the provincial analytics dashboard."""
