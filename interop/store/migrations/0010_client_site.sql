-- A backend client may act for one facility (issue 13): what it pushes by STOW-RS belongs to that
-- site, so the results go back to the site's RIS, EMR and PACS.
ALTER TABLE client ADD COLUMN site text;
