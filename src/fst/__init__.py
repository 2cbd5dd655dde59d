from .errors import FstError, HeaderError
